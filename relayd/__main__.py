"""``python -m relayd`` behaves exactly like the ``relayd`` command."""

from relayd.cli import main

if __name__ == "__main__":
    main()
