import sys

from app.serving.engine.server import main

if __name__ == "__main__":
    sys.exit(main())
