import sys

try:
    from lkfast.eval.cli import main
except KeyboardInterrupt:  # Ctrl-C in the first seconds, while torch and the models are imported
    print("\nlkfast.eval: interrupted while starting, before anything was written: rerun the command", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
