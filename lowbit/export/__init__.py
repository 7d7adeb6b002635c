from lowbit.export.fake import save_fake

__all__ = ["save_fake"]
