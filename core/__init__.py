"""Numerical functions that the trainer and the station share: one code path for preprocessing,
features on aligned grids, kNN scoring and decision fusion. numpy / open3d only: no torch, no sklearn."""
