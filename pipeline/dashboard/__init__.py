"""The analysts' dashboard: a Streamlit app (``finsentinel dashboard``) over the ledger database.

``queries`` holds the paged SQL reads (no Streamlit), ``auth`` the sign-in, ``pages`` the page
renderers and ``app`` the entry script ``streamlit run`` executes.
"""
