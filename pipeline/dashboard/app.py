"""Entry script for ``streamlit run`` (started by ``finsentinel dashboard``)."""

from pipeline.dashboard.pages import main

main()
