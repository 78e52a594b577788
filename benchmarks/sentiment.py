"""News-sentiment benchmarks: Financial PhraseBank (FinGPT split) and Twitter Financial News
with the default encoder, fine-tuning time and inference throughput on CPU (fp32 and int8),
and fp16 throughput on a GPU where there is one.

    python -m benchmarks.sentiment [--skip-twitter] [--threads 2] [--models DIR]
    python -m benchmarks.sentiment --throughput-only   # speed alone, in about a minute

``--throughput-only`` times the same network with randomly initialised weights (speed does not
depend on the weight values), so it needs no fine-tuning run: fp32 and int8 on the CPU, and fp16
on a GPU where there is one.

Writes its section of docs/benchmarks.md (between the sentiment markers; other sections are
left as they are) and the raw numbers to docs/benchmarks-sentiment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "sentiment"
FPB = SHARED / "financial-phrasebank"
TWITTER = SHARED / "twitter-financial-news" / "sent_train.csv"
DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- sentiment:start -->", "<!-- sentiment:end -->"


def machine(threads: int) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def throughput(classifier, texts: list[str], *, explain: bool = False, repeat: int = 1
               ) -> float:
    classifier.classify(texts[:32], explain=explain)  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        classifier.classify(texts, explain=explain)
    return repeat * len(texts) / (time.perf_counter() - started)


def run_task(name: str, train, test, models: Path, threads: int, extra_tests: dict | None = None,
             reuse: bool = False) -> dict[str, Any]:
    from pipeline.sentiment.backends import EncoderClassifier, resolve_model
    from pipeline.sentiment.jobs import evaluate
    from pipeline.sentiment.train import TrainConfig, evaluate_trained, train_classifier

    published = None
    if reuse and (models / name / "CURRENT").exists():
        directory, manifest = resolve_model(models / name)
        if manifest["data"]["sha256"] == train.sha256 and "test_metrics" in manifest:
            published = directory, manifest
    if published is None:
        print(f"[{name}] training on {len(train)} texts", flush=True)
        trained = train_classifier(train, TrainConfig(threads=threads), progress=print)
        held = evaluate_trained(trained, test)
        version, directory = trained.publish(models / name, {"test_metrics": held})
        manifest = json.loads((directory / "manifest.json").read_text())
    else:
        directory, manifest = published
        print(f"[{name}] reusing {directory} (trained on the same data)", flush=True)
    held = manifest["test_metrics"]
    result: dict[str, Any] = {
        "train_rows": len(train), "test_rows": len(test),
        "train_seconds": round(manifest["train_seconds"]), "history": manifest["history"],
        "temperature": manifest["temperature"], "model": f"{name}@{manifest['version']}",
        "test": _short(held), "test_ece": held["ece"],
        "run": {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": "python -m benchmarks.sentiment " + " ".join(sys.argv[1:]),
                "load_average": os.getloadavg(),
                "trained_at": manifest["version"]},
    }
    fp32 = EncoderClassifier.load(directory, device="cpu")
    int8 = EncoderClassifier.load(directory, device="cpu", quantize=True, neighbours=0)
    result["test_int8"] = _short(evaluate(int8, test))
    for key, data in (extra_tests or {}).items():
        result[key] = _short(evaluate(fp32, data))
        result[key + "_int8"] = _short(evaluate(int8, data))
    headlines = test.texts[:1000]
    result["throughput_per_s"] = {
        "fp32": round(throughput(fp32, headlines), 1),
        "int8": round(throughput(int8, headlines), 1),
        "fp32_with_explanations": round(throughput(fp32, headlines[:200], explain=True), 1),
    }
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def gpu_throughput(directory: Path, texts: list[str]) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    from pipeline.sentiment.backends import EncoderClassifier

    fp16 = EncoderClassifier.load(directory, device="cuda", batch_size=512, neighbours=0)
    return {"device": torch.cuda.get_device_name(0),
            "fp16_per_s": round(throughput(fp16, texts, repeat=5), 1)}


def random_weight_throughput(threads: int) -> dict[str, Any]:
    """Texts/s of the encoder backend's network (MiniLM-L6 + mean pooling + linear head) with
    random weights, through the backend's own batching, on the first 1,000 PhraseBank test
    sentences and Twitter held-out headlines: CPU fp32 and int8, GPU fp16 where there is one."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from pipeline.encoder import packaged_model_path
    from pipeline.sentiment.data import load_labelled
    from pipeline.sentiment.model import PooledClassifier, predict_logits

    torch.manual_seed(0)
    base = packaged_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    network = PooledClassifier(AutoModel.from_config(AutoConfig.from_pretrained(str(base))),
                               3).eval()
    splits = FPB / "splits"
    texts = {
        "phrasebank": load_labelled(FPB / "Sentences_50Agree.txt", lines=splits /
                                    "fingpt_seed42_50agree_test_line_numbers.txt").texts[:1000],
        "twitter": load_labelled(TWITTER, format="twitter").texts[:1000],
    }
    variants = {"cpu fp32": (network, "cpu"),
                "cpu int8": (torch.ao.quantization.quantize_dynamic(
                    network, {torch.nn.Linear}, dtype=torch.qint8), "cpu")}
    if torch.cuda.is_available():
        variants["gpu fp16"] = (PooledClassifier(AutoModel.from_config(
            AutoConfig.from_pretrained(str(base))), 3).eval().half().to("cuda"), "cuda")
    out: dict[str, Any] = {"threads": threads, "max_length": 64, "batch_size": 64,
                           "load_average_before": os.getloadavg(), "per_s": {}}
    for name, (model, device) in variants.items():
        batch = 512 if device == "cuda" else 64
        for key, sample in texts.items():
            predict_logits(model, tokenizer, sample[:64], 64, batch_size=batch, device=device)
            began = time.perf_counter()
            predict_logits(model, tokenizer, sample, 64, batch_size=batch, device=device)
            out["per_s"][f"{name} {key}"] = round(len(sample) / (time.perf_counter() - began), 1)
    out["load_average_after"] = os.getloadavg()
    out["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(json.dumps(out), flush=True)
    return out


def _short(report: dict[str, Any]) -> dict[str, Any]:
    return {k: round(report[k], 4) if isinstance(report[k], float) else report[k]
            for k in ("n", "accuracy", "macro_f1", "weighted_f1")}


def seed_study(name: str, train, tests: dict[str, Any], seeds: list[int], threads: int
               ) -> dict[str, Any]:
    """The spread of held-out metrics over training seeds (the seed draws the validation
    split, the head's initial weights and the batch order), and the metrics of the seeds'
    averaged probabilities: what the default recipe reaches, not one lucky or unlucky run."""
    import numpy as np

    from pipeline.sentiment.calibration import softmax
    from pipeline.sentiment.metrics import classification_report
    from pipeline.sentiment.model import predict_logits
    from pipeline.sentiment.train import TrainConfig, train_classifier

    runs, probabilities = [], {key: [] for key in tests}
    for seed in seeds:
        print(f"[{name}] seed {seed}: training on {len(train)} texts", flush=True)
        trained = train_classifier(train, TrainConfig(seed=seed, threads=threads))
        run: dict[str, Any] = {"seed": seed, "train_seconds": round(trained.seconds),
                               "val_accuracy": trained.validation.get("accuracy")}
        for key, data in tests.items():
            logits, _ = predict_logits(trained.model, trained.tokenizer, data.texts,
                                       trained.head.max_length)
            probs = softmax(logits, trained.head.temperature)
            probabilities[key].append(probs)
            run[key] = _short(classification_report(data.labels, probs.argmax(1)))
        print(f"[{name}] {json.dumps(run)}", flush=True)
        runs.append(run)
    ensemble = {key: _short(classification_report(
                    data.labels, np.mean(probabilities[key], 0).argmax(1)))
                for key, data in tests.items()}
    return {"seeds": seeds, "runs": runs, "ensemble": ensemble,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-only", action="store_true",
                        help="rewrite the docs section from docs/benchmarks-sentiment.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--skip-fpb", action="store_true")
    parser.add_argument("--skip-twitter", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the published model when it was trained on the same data")
    parser.add_argument("--throughput-only", action="store_true",
                        help="time the network with random weights (no training) and update "
                             "the throughput line")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")],
                        help="train once per seed (comma-separated) and report the spread of "
                             "the held-out metrics and of the seeds' averaged probabilities "
                             "(no model is published)")
    args = parser.parse_args()
    if args.throughput_only:
        torch.set_num_threads(args.threads)
        out = REPO / "docs" / "benchmarks-sentiment.json"
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged["throughput_random_weights"] = random_weight_throughput(args.threads)
        out.write_text(json.dumps(merged, indent=2) + "\n")
        write_section(merged)
        return
    if args.write_only:
        write_section(json.loads((REPO / "docs" / "benchmarks-sentiment.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine(args.threads),
                               "date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "command": "python -m benchmarks.sentiment " + " ".join(
                                   sys.argv[1:]),
                               "commit": _commit()}
    if args.seeds:
        out = REPO / "docs" / "benchmarks-sentiment.json"
        merged = json.loads(out.read_text()) if out.exists() else {}
        study = merged.get("seed_study", {})
        study["machine"], study["commit"] = machine(args.threads), _commit()
        study["command"] = "python -m benchmarks.sentiment " + " ".join(sys.argv[1:])
        for name, train, tests in _tasks(args.skip_fpb, args.skip_twitter):
            study[name] = seed_study(name, train, tests, args.seeds, args.threads)
        merged["seed_study"] = study
        out.write_text(json.dumps(merged, indent=2) + "\n")
        write_section(merged)
        return
    for name, train, tests in _tasks(args.skip_fpb, args.skip_twitter):
        test = tests.pop("test")
        model = {"fpb": "fpb-fingpt", "twitter": "twitter"}[name]
        results[name] = run_task(model, train, test, args.models, args.threads, tests,
                                 reuse=args.reuse)
        if name == "fpb":
            results["gpu"] = gpu_throughput(args.models / model, test.texts)
    out = REPO / "docs" / "benchmarks-sentiment.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    merged = {**previous, **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    write_section(merged)


def _tasks(skip_fpb: bool, skip_twitter: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, training data, {test name: data}) of the benchmark's tasks."""
    from pipeline.sentiment.data import load_labelled, read_phrasebank, stratified_split

    tasks = []
    if not skip_fpb:
        splits = FPB / "splits"
        train = load_labelled(FPB / "Sentences_50Agree.txt",
                              lines=splits / "fingpt_seed42_50agree_train_line_numbers.txt")
        test = load_labelled(FPB / "Sentences_50Agree.txt",
                             lines=splits / "fingpt_seed42_50agree_test_line_numbers.txt")
        all_agree = set(read_phrasebank(FPB / "Sentences_AllAgree.txt").texts)
        agree = test.subset([i for i, t in enumerate(test.texts) if t in all_agree])
        tasks.append(("fpb", train, {"test": test, "test_all_agree": agree}))
    if not skip_twitter:
        data = load_labelled(TWITTER, format="twitter")
        keep, held = stratified_split(data.labels, 0.15, seed=42)
        tasks.append(("twitter", data.subset(keep), {"test": data.subset(held)}))
    return tasks


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _seed_lines(study: dict[str, Any] | None) -> list[str]:
    if not study:
        return []
    m = study["machine"]
    lines = ["", "### Spread over training seeds", "",
             "The default recipe trained once per seed (the seed draws the validation split, "
             "the head's initial weights and the batch order), each run scored on the same "
             "held-out lines, and the average of the seeds' calibrated probabilities (an "
             "ensemble: as many forward passes per text as seeds). No seed is picked on the "
             f"test lines. Command: `{study['command']}`, commit {study['commit']}, "
             f"{m['cpu']}, {m['torch_threads']} threads.", "",
             "| task | held-out lines | per seed: accuracy / weighted F1 | mean accuracy "
             "(min–max) | mean weighted F1 | ensemble accuracy / weighted F1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    names = {"fpb": "PhraseBank (FinGPT split)", "twitter": "Twitter (15 % held out)"}
    for task in ("fpb", "twitter"):
        if task not in study:
            continue
        t = study[task]
        for key in t["ensemble"]:
            runs = [run[key] for run in t["runs"]]
            accuracy = [x["accuracy"] for x in runs]
            weighted = [x["weighted_f1"] for x in runs]
            each = "; ".join(f"seed {run['seed']}: {run[key]['accuracy']:.4f} / "
                             f"{run[key]['weighted_f1']:.4f}" for run in t["runs"])
            e = t["ensemble"][key]
            label = names[task] + (", all-agree lines" if key == "test_all_agree" else "")
            lines.append(f"| {label} | {runs[0]['n']} | {each} | {sum(accuracy) / len(runs):.4f}"
                         f" ({min(accuracy):.4f}–{max(accuracy):.4f}) | "
                         f"{sum(weighted) / len(runs):.4f} | {e['accuracy']:.4f} / "
                         f"{e['weighted_f1']:.4f} |")
    return lines


def write_section(r: dict[str, Any]) -> None:
    m = r["machine"]
    lines = [START, "## News sentiment (default `encoder` backend: MiniLM-L6 fine-tuned)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
             f"{m['torch_threads']} threads; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} (a load above 2 "
             "means other jobs shared the two cores, and times and rates are pessimistic). "
             f"Date {r['date']}, commit {r['commit']}. Command: `{r['command']}`.", ""]
    rows = []
    if "fpb" in r:
        f = r["fpb"]
        rows += [("Financial PhraseBank, FinGPT split (test 1,212)", f["test"], f["test_int8"],
                  "accuracy ≥ 0.87, weighted F1 ≥ 0.87"),
                 ("… its all-agree test lines", f["test_all_agree"], f["test_all_agree_int8"],
                  "accuracy ≥ 0.96")]
    if "twitter" in r:
        t = r["twitter"]
        rows.append(("Twitter Financial News, 15 % of sent_train.csv held out (stratified, "
                     "seed 42)", t["test"], t["test_int8"], "weighted F1 ≥ 0.86"))
    lines += ["| data | n | accuracy | macro F1 | weighted F1 | int8: accuracy / weighted F1 | "
              "target |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, fp, q, target in rows:
        lines.append(f"| {name} | {fp['n']} | {fp['accuracy']:.4f} | {fp['macro_f1']:.4f} | "
                     f"{fp['weighted_f1']:.4f} | {q['accuracy']:.4f} / {q['weighted_f1']:.4f} | "
                     f"{target} |")
    lines += ["", "Throughput is texts per second over the first 1,000 test texts (PhraseBank "
              "sentences average about 23 words; Twitter headlines are shorter), batch 64; "
              "'with explanations' (first 200 texts) adds occlusion (one extra forward per "
              "word) and the FAISS nearest training examples. Training texts include the "
              "10 % stratified validation split.", "",
              "| task | training texts | fine-tuning wall time | epochs (val. accuracy) | "
              "CPU texts/s fp32 | int8 | fp32 with explanations |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in ("fpb", "twitter"):
        if key in r:
            t = r[key]
            epochs = ", ".join(f"{h['val_accuracy']:.3f}" for h in t["history"])
            tp = t["throughput_per_s"]
            lines.append(f"| {key} | {t['train_rows']} | {t['train_seconds'] / 60:.1f} min | "
                         f"{epochs} | {tp['fp32']} | {tp['int8']} | "
                         f"{tp['fp32_with_explanations']} |")
    if "twitter" not in r:
        lines += ["", "Twitter Financial News: not measured yet (`python -m benchmarks.sentiment "
                  "--skip-fpb` trains on 85 % of sent_train.csv and scores the other 15 %)."]
    runs = [f"{key}: `{r[key]['run']['command']}` on {r[key]['run']['date']} (model trained "
            f"{r[key]['run']['trained_at']}, load average {r[key]['run']['load_average'][0]:.1f})"
            for key in ("fpb", "twitter") if key in r and "run" in r[key]]
    if runs:
        lines += ["", "Runs: " + "; ".join(runs) + "."]
    speed = r.get("throughput_random_weights")
    if speed:
        rates = "; ".join(f"{k} {v}/s" for k, v in speed["per_s"].items())
        lines += ["", f"Throughput of the same network with random weights "
                  f"(`python -m benchmarks.sentiment --throughput-only`, {speed['date']}, "
                  f"{speed['threads']} threads, batch {speed['batch_size']}, load average "
                  f"{speed['load_average_before'][0]:.1f} before, "
                  f"{speed['load_average_after'][0]:.1f} after): {rates}. Target ≥ 200 "
                  "headlines/s on 2 CPU cores."]
    lines += _seed_lines(r.get("seed_study"))
    gpu = r.get("gpu")
    lines += ["", f"GPU fp16 throughput: {gpu['fp16_per_s']} headlines/s on {gpu['device']}."
              if gpu else "GPU fp16 throughput: not measured (no GPU on the benchmark machine; "
              "`EncoderClassifier(device='cuda')` runs the same network in fp16).",
              "", "Anchors (docs in `../shared/data/README.md`): FinBERT 0.86 accuracy on "
              "PhraseBank, FinGPT v3.3 weighted F1 0.882 (PhraseBank) and 0.903 (Twitter), "
              "FinBERT 0.733 on Twitter; TF-IDF + logistic regression 0.78 / 0.83.", END]
    section = "\n".join(lines) + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
