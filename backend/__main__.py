import sys

try:  # Ctrl-C while Python is still importing (before a job's own handler is installed): a plain message
    from backend.cli import main

    sys.exit(main())
except KeyboardInterrupt:
    print("\nCancelled.", file=sys.stderr)
    sys.exit(1)
