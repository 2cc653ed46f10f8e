"""The backup agent: checks backup freshness and health from restic's snapshot list and
from file timestamps in a mounted folder; raises an event when one turns late or failing."""
