"""The Flower ClientApp fedsim runs in simulation and on real devices."""
