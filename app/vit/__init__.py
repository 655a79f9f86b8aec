"""Model code: dense timm DeiT plus our compressed variants (DGSSA static attention, GLAD)."""
