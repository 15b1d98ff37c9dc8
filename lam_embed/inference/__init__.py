"""What runs only at inference: the checks of a forward pass's inputs, CUDA graphs of the
forward pass and the batch split over CUDA streams."""
