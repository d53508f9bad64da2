"""Where actors run: Ray started or joined (``connect``), the node a process is on (``node``), placement
groups for the learner ranks and the engines (``placement``), and the storage rule of a run that spans
nodes (``storage``). Below the components: the learner and the engines ask it where they are."""
