"""`refiner atlas`: a layer x layer map of where two nets agree (CKA in one streamed pass), and g on the matched pairs."""
