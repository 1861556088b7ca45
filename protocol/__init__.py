"""The contract shared by every role: wire messages and the bundle manifest. Imports nothing of ours."""
