"""`fleetserve dashboard`: the URL of the metrics service's live dashboard page, opened in a browser on request."""

from __future__ import annotations

import sys
import webbrowser

from shared.cluster import read_state
from shared.tls import Tls, scheme


def run_dashboard(args) -> int:
    state = {} if args.address else read_state()
    address = args.address or state.get("dashboard", "")
    if not address:
        print(
            "error: the running cluster's metrics service serves no dashboard (--dashboard-port -1?)",
            file=sys.stderr,
        )
        return 1
    url = f"{scheme(Tls.for_tools(state or None))}://{address}/?refresh={int(args.refresh * 1000)}"
    print(url)
    if args.open and not webbrowser.open(url):
        print("note: no browser could be started here; open the URL above", file=sys.stderr)
    return 0
