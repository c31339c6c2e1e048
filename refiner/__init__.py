"""refiner: compare what two trained networks know and build refined, deployable models from it.

Data flows one way through the subpackages: `data` (tasks, preprocessing) ->
`models` (architectures, checkpoints, layer cuts) -> `engine` (features, g,
fitting, the Var table, training loops) -> `build` (refined model, export,
model repository) -> the artifact format that `serving` reads. `analyses`
holds the paper's other applications on top of the engine.
"""

__version__ = "0.1.0"
