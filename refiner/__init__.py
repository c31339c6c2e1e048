"""refiner: compare what two trained networks know and build refined, deployable models from it.

Data flows one way: tasks/datasets -> features -> isomorphism (g) -> build (refined
model) -> export -> the model repository that `serving` reads.
"""

__version__ = "0.1.0"
