"""Provider plugins: how each vendor's login runs, what it writes, how to read it back."""
