"""Domain core: frozen types, the error tree, settings, coded concepts, priority policy.

Imports nothing of ours and nothing heavier than numpy and pydantic, so every other package
(and every tool an integrator writes) can depend on it.
"""
