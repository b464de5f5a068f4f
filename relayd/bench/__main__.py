"""``python -m relayd.bench`` runs ``relayd bench``."""

import sys

from relayd.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
