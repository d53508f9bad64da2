"""Where actors run. Below the components: the learner and the engines ask it where they are.

connect.py    Ray started or joined, bound to loopback unless configured otherwise
node.py       the node a process is on and its address (actors report it)
placement.py  placement groups for the learner ranks and the engines, checked before use
storage.py    the storage rule of a run that spans nodes: one run folder and one model folder for all
startup.py    the start-up every run shares: absolute paths and the model folder, Ray, the storage check
"""
