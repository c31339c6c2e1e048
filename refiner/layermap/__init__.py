"""The layer map behind `refiner atlas` and `refiner.atlas()`: CKA between every chosen layer of two nets in one streamed pass, and g on the matched pairs.

Named layermap, not atlas, so that `refiner.atlas` can be the public function without a submodule import replacing it.
"""
