"""The bundled demo model's world: procedurally drawn shapes (world.py) and a checker that scores images (checker.py).

May import: engine.core.
"""
