"""An exact, untrained AutoencoderKL: latents are the image's pixels (vae_scale_factor 1).

No VAE can be trained well in this project's CPU budget, so the testbed's "VAE" is a diffusers
``AutoencoderKL`` whose weights are set by hand to pass RGB through: latent channels 0-2 are
the image in [-1, 1], channel 3 is zero. Each block is made an identity (resnet conv2 and
attention output zeroed); the GroupNorm+SiLU before ``conv_out`` is kept linear by two large
constant channels (+K, -K) that dominate the group statistics and a zero channel that carries
the group mean, so decode(encode(x)) == x to ~1e-4. The UNet therefore denoises pixels.
"""
from __future__ import annotations

import torch

C = 8  # internal width: 0-2 RGB, 3 = +K, 4 = -K, 5 = zero reference, 6-7 unused
K = 100.0
BETA = 20.0  # shifts SiLU into its linear range


def make_identity_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(C,), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1, sample_size=32,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for name, m in vae.named_modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(1.0)
        # resnets: conv2 = 0 -> identity; attention: to_out = 0 -> identity (residual)
        sigma = (2 * K * K / C) ** 0.5  # group std, dominated by the constant channels

        def set_in(conv, n_in):
            w = conv.weight
            for c in range(n_in):
                w[c, c, 1, 1] = 1.0
            conv.bias[3] = K
            conv.bias[4] = -K

        def set_norm_out(norm):
            norm.weight.fill_(1.0)
            norm.bias.fill_(BETA)

        def set_out(conv, n_out):
            for c in range(n_out):
                conv.weight[c, c, 1, 1] = sigma
                conv.weight[c, 5, 1, 1] = -sigma

        enc, dec = vae.encoder, vae.decoder
        set_in(enc.conv_in, 3)
        set_norm_out(enc.conv_norm_out)
        set_out(enc.conv_out, 3)  # mean channels 0-2; channel 3 and logvar weights stay 0
        enc.conv_out.bias[latent_channels:].fill_(-30.0)  # logvar -> std 3e-7
        set_in(dec.conv_in, 3)
        set_norm_out(dec.conv_norm_out)
        set_out(dec.conv_out, 3)
        for qc in (vae.quant_conv, vae.post_quant_conv):
            if qc is not None:
                qc.weight.copy_(torch.eye(qc.weight.shape[0])[:, :, None, None])
                qc.bias.zero_()
    return vae
