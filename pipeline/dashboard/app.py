"""Entry script for ``streamlit run`` (started by ``finsentinel dashboard``).

Streamlit runs it as ``__main__``; the guard keeps it inert when a process started with the
``spawn`` method (Dask's workers, say) re-imports the parent's main script, which it is after
an AppTest run in the same process."""

from pipeline.dashboard.pages import main

if __name__ == "__main__":
    main()
