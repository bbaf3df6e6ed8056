"""The `catcurate` console command (catcurate/cli.py): filter, distill, redecide, train, evaluate, experiment.
It sits above every other package and only dispatches to their entry points."""
