#!/usr/bin/env python3
"""A modifying before-stage script (modifies = true): trims the client's name and
upper-cases its first letter, then prints the envelope back on stdout.
"""
import json
import sys

envelope = json.load(sys.stdin)
data = envelope.get("data", {})
if isinstance(data.get("name"), str):
    name = data["name"].strip()
    data["name"] = name[:1].upper() + name[1:]
json.dump(envelope, sys.stdout)
