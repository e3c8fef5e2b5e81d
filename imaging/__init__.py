"""Reading a study from files: header scan, series selection (rules as data), volumes and the
request attributes. What the node, training, evaluation and the key images all need, without the
node. Imports `core` only."""
