"""The measured settings of ``fedseg bench quality --preset``: plain data,
so that a command can check what a user typed against them before torch loads."""

# Retina defaults (measured, docs/benchmarks.md): RGB input, 96-px patches.
RETINA = {"input-channels": "rgb", "patch-size": 96, "patches-per-image": 8,
          "batch-size": 16, "learning-rate": 2e-3, "evaluate-every": 30}
# Hippocampus (MSD Task04, 3D MR crops of about 35 x 50 x 35 voxels; measured,
# docs/benchmarks.md): a 5-level 3D U-Net of half width (8 to 128 channels,
# one residual unit a level: 0.61 M parameters) on 32-voxel patches, which
# cover most of a crop; 256 rounds of 1 patch of each case, scored at rounds
# 128 and 256. Against the 4-level U-Net of 16 to 128 channels for 64 rounds
# of 2 patches (the preset of commits 75e7ca3 to 119351c: 34 min a table,
# federated 0.981 to 0.993 x pooled), rounds of one patch keep the sites'
# models closer together, and the narrower, deeper U-Net pays for them.
HIPPOCAMPUS = {"model-spatial-dims": 3, "structures": "Anterior,Posterior",
               "model-channels": "8,16,32,64,128", "model-res-units": 1, "patch-size": 32,
               "patches-per-image": 1, "batch-size": 8, "learning-rate": 2e-3,
               "evaluate-every": 128, "num-rounds": 256, "local-epochs": 1}
PRESETS = {"retina": RETINA, "hippocampus": HIPPOCAMPUS, "none": {}}
