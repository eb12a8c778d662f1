"""``python -m backend`` is the ``seggpt-backend`` command."""
from backend.cli import main

main()
