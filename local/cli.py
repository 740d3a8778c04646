"""``python -m local.cli [--json] COMMAND ...``: the operator command line with the local bus plugged in.

``shared/`` never imports ``local/``, so ``python -m shared.cli`` cannot publish to the in-memory
local bus (``DELIVER_URL`` set, no ``PUBSUB_EMULATOR_HOST``): it says so and publishes nothing.
Against a stack on the local bus, run this instead: the same commands and output, and ``send`` /
``publish-event`` wait until ``DELIVER_URL`` / ``ON_EVENT_URL`` took their message before exiting.
"""

from __future__ import annotations

import sys

from local.bus import plug_in
from shared import cli


def main(argv: list[str] | None = None) -> int:
    plug_in()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
