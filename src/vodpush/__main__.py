import sys

from vodpush.cli import main

sys.exit(main())
