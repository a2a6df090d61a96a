#!/usr/bin/env bash
# Stop the background SuperLink that `flwr run` started for local simulations.
pkill -f "flower-superlink --insecure --simulation" && echo "local SuperLink stopped" || echo "no local SuperLink running"
