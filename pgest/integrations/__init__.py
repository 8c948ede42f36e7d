"""Ways in from other frameworks. Each module imports its framework on first
use and says which extra installs it (``pip install ".[hf]"``)."""
