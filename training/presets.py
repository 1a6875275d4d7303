"""Named training configurations: the values that differ from TrainConfig's defaults (training/config.py,
a small CNN at 64x64 trained from scratch, attention dim 256); command-line flags override them."""

# fmt: off
PRESETS: dict[str, dict] = {
    # The committed default model: the wide-domain shapes dataset (training/datasets/shapes_wide.py),
    # a small CNN trained from scratch at 96x96 (docs/MODEL.md: 64x64 was too coarse for tiny objects),
    # with a convolution at full resolution first (ahead of small_cnn in three runs, docs/MODEL-EXPERIMENTS.md), and
    # the scene loss, whose cell classifier ships in the bundle for grounded decoding (captioning/grounding.py).
    # `make train-default` adds --data small_corner=0.5 (training/datasets/shapes_wide.py).
    "default": dict(dataset="shapes_wide", backbone="small_cnn_fullres", image_size=96, epochs=8, train_limit=24000,
                    val_limit=500, scene_loss_weight=0.5, name="shapes-wide-small-cnn"),
    # The reference design: frozen InceptionResNetV2 at 299x299, five captions per image. Names no
    # dataset: pass --dataset coco|karpathy|flickr8k|list and its --data options.
    "reference": dict(backbone="inception_resnet_v2", weights="imagenet", trainable_backbone=False, image_size=299,
                      attention_dim=512, embedding_dim=512, vocab_size=20000, max_length=64, epochs=20,
                      learning_rate=1e-3, name="reference"),
    # ShapeWorld (an external generator's captions, in COCO format, see docs/TRAINING.md): 64x64
    # scenes, a 44-word vocabulary, captions of up to 13 words. 6000 training images are few, so
    # they are mirrored (left/right swapped in the captions) and trained for 16 epochs. Read at 96 px
    # by the default model's encoder since round 37 (docs/TRAINING.md section 7; 45-100 s an epoch), and
    # since round 44 starting from its trained backbone (the committed default model, trained on this
    # project's own shapes data, nothing of ShapeWorld), fine-tuned: the 6000 images alone taught a
    # backbone far less (docs/MODEL-EXPERIMENTS.md section 5). The name stays the one the bundles carry.
    "shapeworld": dict(dataset="coco", backbone="small_cnn_fullres", image_size=96, max_length=16, flip=True,
                       weights="model_artifacts/default/7", trainable_backbone=True,
                       epochs=16, name="shapeworld-small-cnn"),
    # A quick run for smoke tests and CI.
    "tiny": dict(dataset="shapes", attention_dim=32, embedding_dim=16, batch_size=16, epochs=1, learning_rate=3e-3,
                 patience=1, train_limit=64, val_limit=16, name="shapes-tiny"),
}
# fmt: on
