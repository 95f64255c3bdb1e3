"""The released dVAE's layout, which the model and the converter both follow."""

GROUPS = 4  # the released encoder / decoder have 4 groups: a grid of image_size / 8
