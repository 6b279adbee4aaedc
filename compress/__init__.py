"""compress: prune, distill, quantize, export and benchmark a trained PyTorch model."""
__version__ = "0.1.0"
