from django.contrib import admin

from demo.models import Contact


@admin.register(Contact)
class ContactAdmin(admin.ModelAdmin):
    list_display = ["name", "email", "company", "created_at"]
    list_filter = ["company"]
    search_fields = ["name", "email"]
