"""The ``compress`` command line's parts beside ``cli.py`` (which holds the group, the compress commands and the exit
codes): the terminal and the options every command shares (:mod:`cli_commands.common`), and the commands that ship and
watch a model (:mod:`cli_commands.serving`: serve, loadtest, package; :mod:`cli_commands.watch`: drift).
"""
