"""The notify agent: delivers notifications to the owner (ntfy, webhook) and, with approval,
to configured contacts."""
