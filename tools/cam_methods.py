"""The CAM methods report.py offers (--methods), in plain Python: its command line is parsed
before torch loads; tools/report_figures.py makes the maps."""

# --methods name -> pytorch-grad-cam's class, imported where a map is made: grad-cam pulls in
# torchvision, scikit-learn and scipy (seconds) that --help and a refused input need not wait for
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM",
           "eigencam": "EigenCAM", "layercam": "LayerCAM"}
