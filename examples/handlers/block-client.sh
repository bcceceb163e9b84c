#!/bin/sh
# An after-stage script: block a client on the softswitch when its balance hits zero.
# provisiond gives the event in the environment and the envelope on stdin; exit 0 means
# delivered, anything else is retried with backoff.
set -eu
envelope=$(cat)
echo "blocking client ${PROVISIONING_OBJECT_ID} on ${SWITCH_API:-the switch} (attempt ${PROVISIONING_ATTEMPT})" >&2
# A real script would call the switch here, e.g.:
#   curl -fsS -X POST "$SWITCH_API/clients/$PROVISIONING_OBJECT_ID/block"
: "$envelope"
