"""The user actions shared by the command line and the app (analyze, plan, run, export), sweeps over planners and budgets, and workspaces on disk."""
