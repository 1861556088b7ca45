"""The `m3dm` command: a thin app that loads each role's CLI module only when its command runs."""
