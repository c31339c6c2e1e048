"""Stage 1, data: tasks (which images, which classes, which splits) and image preprocessing."""
