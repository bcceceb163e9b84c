#!/usr/bin/env python3
"""A before-stage script: forbid creating a client without a name.

provisiond writes the envelope to stdin. Exit 0 allows; a non-zero exit forbids, and
the last lines of stderr become the message the billing sees.
"""
import json
import sys

envelope = json.load(sys.stdin)
name = str(envelope.get("data", {}).get("name", "")).strip()
if not name:
    print("a client needs a name", file=sys.stderr)
    sys.exit(1)
