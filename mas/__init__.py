"""The `mas` command: composes the security, broker and orchestrator layers for operators."""
