"""The paper's other applications (Sections 4.1, 4.2, 4.4, 4.5) as `refiner analyze` commands."""
