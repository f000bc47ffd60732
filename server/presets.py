"""The measured settings of ``fedseg bench quality --preset``: plain data,
so that a command can check what a user typed against them before torch loads."""

# Retina defaults (measured, docs/benchmarks.md): RGB input, 96-px patches.
RETINA = {"input-channels": "rgb", "patch-size": 96, "patches-per-image": 8,
          "batch-size": 16, "learning-rate": 2e-3, "evaluate-every": 30}
# Hippocampus (MSD Task04, 3D MR crops of about 35 x 50 x 35 voxels; measured,
# docs/benchmarks.md): a 4-level 3D U-Net of one residual unit a level (half
# the cost of two, pooled Dice 0.873 against 0.879 at 16 passes on 3 even
# sites) on 32-voxel patches, which cover most of a crop; 128 patches of each
# case in all, as 64 rounds of 2: for the same steps, FedAvg on 3 even sites
# went 0.857, 0.861, 0.867 mean Dice as 16 rounds of 8, 32 of 4, 64 of 2
# (pooled 0.873-0.875), and 128 of 1 added nothing (0.868).
HIPPOCAMPUS = {"model-spatial-dims": 3, "structures": "Anterior,Posterior",
               "model-channels": "16,32,64,128", "model-res-units": 1, "patch-size": 32,
               "patches-per-image": 2, "batch-size": 8, "learning-rate": 2e-3,
               "evaluate-every": 16, "num-rounds": 64, "local-epochs": 1}
PRESETS = {"retina": RETINA, "hippocampus": HIPPOCAMPUS, "none": {}}
