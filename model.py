"""model.py: placeholder while Step 1 lands (constants shared with data.py)."""
IGNORE_INDEX = -100        # label value the loss ignores (MoE-LLaVA constants.py)
IMAGE_TOKEN_INDEX = -200   # input id standing for one image's features (MoE-LLaVA constants.py)
