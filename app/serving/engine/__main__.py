import sys

from app.serving.engine.server import main

sys.exit(main())
