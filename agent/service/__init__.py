"""The running agent: configuration, the runtime that composes the stages, the command
line, status, systemd notification, and the demo.
"""
