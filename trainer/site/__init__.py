"""`m3dm-site`: an rgb feature network learned from one class's own training normals (no pretrained weights).

model.py holds the encoder the station runs (exported to ONNX like any backbone) and the loss-only heads;
augment.py makes the synthetic anomalies of the self-supervised objective; train.py trains, saves and loads.
"""
